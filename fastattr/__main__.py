from fastattr.cli import main

raise SystemExit(main())
