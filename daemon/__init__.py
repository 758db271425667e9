"""seatwatch: one asyncio daemon that watches class sections and emails students when a seat opens."""
