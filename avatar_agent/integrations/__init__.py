"""Adapters that plug an :class:`~avatar_agent.types.AvatarSession` into voice-agent frameworks.

* :mod:`.livekit` — a LiveKit Agents ``VideoGenerator`` (extra ``livekit``), in the agent's own
  job or as a remote avatar worker (:mod:`.livekit_worker`, ``avatar-agent livekit-worker``).
* :mod:`.pipecat` — a pipecat ``FrameProcessor`` between TTS and the transport (extra ``pipecat``).

The adapters only translate types: pacing, A/V sync, segment accounting and interruption all
belong to the session.  Each module imports its framework at import time, so importing one
without its extra installed fails with an ImportError naming the extra.
"""
