"""Plain-PyTorch statements of every op's math: the semantics, the fallback and the test oracle."""
