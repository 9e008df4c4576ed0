from stream_server.cli import main

raise SystemExit(main())
