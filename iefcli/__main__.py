from iefcli.cli import app

app(prog_name="ief")
