from anydepth.cli import main

raise SystemExit(main())
