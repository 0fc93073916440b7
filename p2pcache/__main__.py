from p2pcache.cli.main import app

app(prog_name="p2pcache")
