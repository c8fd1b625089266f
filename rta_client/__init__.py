"""Command-line clients: stream a file, the microphone, many clients at once, and offline tools."""
