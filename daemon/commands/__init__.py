"""The CLI's commands other than `run`: admin, checks, demo, embedded servers."""
