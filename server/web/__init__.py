"""The HTTP door (aiohttp): the app and its middleware, the routes by family,
and the HTTP form of a refusal. Only this package knows aiohttp."""
