"""Training a run: the loop (train), what it trains with (trainer), optimizer and schedule (optim), the batch-size
search (autobatch), the learning-rate range test (lrfind), the paper's grid (sweep), experiment trackers (tracking)."""
