"""The one training loop and what it needs: batches, checkpoints, several processes, regularisers, stop signals."""
