"""seatwatch: one asyncio daemon that watches class sections and emails students when a seat opens."""

__version__ = "0.1.0"
