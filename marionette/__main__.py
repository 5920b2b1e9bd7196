from marionette.cli import main

raise SystemExit(main())
