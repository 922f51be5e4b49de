"""The figures of the notebooks, one module per notebook family; each function draws from tables
and volumes the stages wrote and returns the figure."""
