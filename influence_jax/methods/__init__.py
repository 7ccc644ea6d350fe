"""The papers' methods, built on the core: last-layer, classification and relative influence,
memorization (Kounavis, Dia & Ramazanli), and generalized influence functions (GIF, Lyu et al.)."""
