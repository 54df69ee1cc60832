"""Networks: encoders/backbones, decoders and generators, each small enough to read on one screen."""
