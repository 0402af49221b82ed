from .tune.launch import main

raise SystemExit(main())
