"""Small real inference engines (Llama family, torch) that publish KV to kvstore and fetch it.

The engines arrive with issue 4; this package holds its place in the layout.
"""
