"""What only the notebooks and the book use: the environment doctor (``doctor``), the labs'
metadata and rules (``labs``), the ``%%sandbox`` magic (``magics``) and live widgets (``widgets``)."""
