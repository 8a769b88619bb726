from fastattr.tools.cli import main

raise SystemExit(main())
