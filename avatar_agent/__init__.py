"""avatar-agent: one portrait + live speech → a real-time talking-head video stream."""

__version__ = "0.1.0"
