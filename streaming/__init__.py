"""asyncio + aiortc avatar server."""
