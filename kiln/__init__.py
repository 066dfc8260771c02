"""kiln: the shared kernel imported by both the API and the workers (no torch, no FastAPI here).

The SDK is `kiln.Client` (kiln/client.py), imported on first use so that the API and the workers do not load it:

    >>> from kiln import Client
    >>> with Client() as kiln:
    ...     job = kiln.wait(kiln.submit({"data": {"dataset": "iris"}, "epochs": 20})["id"], timeout=300)
"""

__version__ = "0.1.0"
__all__ = ["Client", "KilnError"]


def __getattr__(name: str):
    if name in __all__:
        from kiln import client

        return getattr(client, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
