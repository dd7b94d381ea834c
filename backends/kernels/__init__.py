"""The native implementations, one module per registry name (see ``dla_backends.registry``).

Each module keeps only its launch or scan code; the host-side work every call shares
(validation, layout, forced traces, the result) lives once in ``dla_backends.host``.
"""
