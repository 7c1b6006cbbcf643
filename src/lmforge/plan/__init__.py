"""Planning: what fits on which hardware, how fast and at what cost (`lmforge plan`), and probes that check it."""
