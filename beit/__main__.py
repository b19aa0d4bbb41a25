from beit.cli import app

app(prog_name="beit")
