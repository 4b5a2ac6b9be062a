"""m3lab: reproducible quantized MiniMax-M3 results as a papermill DAG.

download -> quantize -> serve -> correctness -> needle -> benchmark -> plot
"""

__version__ = "0.1.0"
