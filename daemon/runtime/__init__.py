"""The running daemon: supervisor, health listener, metrics, systemd notify."""
