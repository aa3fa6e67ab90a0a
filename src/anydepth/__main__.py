from anydepth.cli import entry

entry()
