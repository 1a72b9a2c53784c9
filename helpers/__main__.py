"""Command line: ``python -m helpers doctor [--json]``, ``python -m helpers labs [--check|--execute]``,
``python -m helpers sandbox run [docker-run-like options] -- command``, ``python -m helpers apiserver build``."""
import argparse
import json
import sys

from helpers.notebook import doctor, labs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sandbox"]:  # docker-run-like options: the sandbox's own parser
        from helpers.containers import sandbox
        return sandbox.main(argv[1:])
    if argv[:1] == ["apiserver"]:  # build | status: the API server build's own parser
        from helpers.orchestration import apiserver
        return apiserver.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="what this machine can do, and which labs can run here")
    doc.add_argument("--json", action="store_true", help="one key per capability")
    lab = sub.add_parser("labs", help="check the committed notebooks, or re-execute them")
    lab.add_argument("--check", action="store_true", help="report notebooks that break the course's rules")
    lab.add_argument("--execute", action="store_true", help="re-execute every lab this machine can run")
    lab.add_argument("names", nargs="*", help="only these labs (file stems)")
    sub.add_parser("sandbox", help="a container from scratch: sandbox run [options] -- command")
    sub.add_parser("apiserver", help="build the Kubernetes API server from Debian's Go sources")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        report = doctor.probe()
        if args.json:
            print(json.dumps({k: c.as_dict() for k, c in report.items()}, indent=2))
        else:
            print(doctor.render(report, labs.all_labs()))
        return 0

    chosen = [l for l in labs.all_labs() if not args.names or l.name in args.names]
    status = 0
    if args.check:
        for l in chosen:
            for problem in labs.problems(l.path):
                print(f"{l.path.name}: {problem}")
                status = 1
        for problem in labs.module_problems():
            print(problem)
            status = 1
    if args.execute:
        for l in chosen:
            why = doctor.unmet(l.requires)
            print(f"{l.name}: " + (f"skipped ({'; '.join(why)})" if why else "executing"), flush=True)
            if not why:
                labs.execute([l])
    return status


if __name__ == "__main__":
    sys.exit(main())
