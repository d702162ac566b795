"""Built-in proxim plugins, one module per algorithm family, registered through the ``proxim`` entry points.

They use only the public ``proxim`` API, exactly as a third-party plugin would.
"""
