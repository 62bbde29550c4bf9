"""Audio loading and the Whisper log-mel front end."""
