"""Latency on real hardware: TFLite's benchmark_model over adb (`adb`), LiteRT's CompiledModel
benchmark on the host (`litert_host`)."""
