"""Training the embedded tiny MiniMax-M3 (not part of the m3lab runtime; nothing under m3lab/ imports it).

    python -m tools.tiny_m3.train train|eval|install ...   (from the repository root)

`synthdata` generates its training data and held-out eval items; `train` trains, evaluates and installs the
weights into m3lab/assets/tiny-m3/, which is all a run reads.
"""
