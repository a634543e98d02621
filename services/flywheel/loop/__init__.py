"""The local loop: prompt source, process supervisor, the demo orchestration and its report."""
