from midfill.cli import app

app()
