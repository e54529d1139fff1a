"""Data: reading and validating records, the prepare stage, chat rendering, packing, the SFT task mixture."""
