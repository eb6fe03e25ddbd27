"""`python -m padim_ray ...`: the padim-ray command with this interpreter (where no console script is installed)."""

from padim_ray.cli import app

app(prog_name="padim-ray")
