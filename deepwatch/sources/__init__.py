"""Where raw records come from: files (plain, .gz, .bz2, .xz, globs), stdin; Kafka and HTTP
live in serve/."""

from .files import Chunk, InputSpec, iter_chunks, parse_input_spec, read_inputs

__all__ = ["Chunk", "InputSpec", "iter_chunks", "parse_input_spec", "read_inputs"]
