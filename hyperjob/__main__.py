from hyperjob.cli.main import main

raise SystemExit(main())
