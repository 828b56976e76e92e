"""avatar-agent."""
