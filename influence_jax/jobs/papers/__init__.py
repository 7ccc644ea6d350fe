"""The papers' experiments as jobs: GIF class removal and label change against retraining (Lyu et al.),
memorization labels and selective removal (Kounavis et al.)."""
