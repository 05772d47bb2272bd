"""``python -m lwq``."""
from lwq.cli import main

main()
