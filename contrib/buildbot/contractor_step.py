"""A Buildbot step that runs `contractor build` and reports its outcome as Buildbot does.

`contractor build` runs the project's script in a throwaway builder VM with no network
interface and keeps a record of the build in `.contractor/builds/<id>/` (`.contractor/latest`
points at the newest). Its exit code says whose fault an unsuccessful build was, and this
step turns that into Buildbot's results, so that a broken machine shows as an EXCEPTION
(purple, retried or investigated by the fleet's owner) rather than as the project's FAILURE:

    exit code  contractor's meaning                                  Buildbot result
    0          the script succeeded                                   SUCCESS   (0)
    1          the script failed, timed out, or hit a limit           FAILURE   (2)
    2          bad input: the project's contractor.toml               FAILURE   (2)
    3          infrastructure: libvirt, the VM, the agent, a tool     EXCEPTION (4)
    130        interrupted (SIGTERM): the VM was destroyed            CANCELLED (6)
    other      not contractor's (a signal, the binary missing, ...)   EXCEPTION (4)

A build stopped from the master (its web UI, or the REST API's `stop` on the build) makes
the worker send SIGTERM to the step's process group; `contractor build` then destroys its VM
and exits 130. `sigtermTime` (default 60 s) is how long the worker waits before SIGKILL;
a SIGKILL leaves no VM either (libvirt destroys a VM whose owner's connection closes).

Use it in master.cfg (this file next to master.cfg, or on the master's PYTHONPATH):

    from contractor_step import ContractorBuild
    factory.addStep(steps.Git(repourl=..., mode="incremental"))
    factory.addStep(ContractorBuild())
    factory.addStep(steps.DirectoryUpload(
        workersrc=".contractor/latest/artifacts",
        masterdest=util.Interpolate("artifacts/%(prop:buildername)s/%(prop:buildnumber)s")))

Keyword arguments: `contractor` (the executable, default "contractor" on the worker's
PATH), `args` (more arguments after `build`, e.g. ["--cold"]), and any of ShellCommand's
(`env`, `workdir`, `timeout`, `sigtermTime`, ...). Tested with Buildbot 3.7
(tests/buildbot.rs in Contractor's repository).
"""

from twisted.internet import defer

from buildbot.process.results import CANCELLED, EXCEPTION, FAILURE, SUCCESS
from buildbot.steps.shell import ShellCommand

# contractor's exit codes (README, "Exit codes"; ExitCode in contractor-protocol/src/exit.rs).
EXIT_SUCCESS = 0
EXIT_BUILD_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INFRASTRUCTURE = 3
EXIT_INTERRUPTED = 130

RESULTS = {
    EXIT_SUCCESS: SUCCESS,
    EXIT_BUILD_FAILED: FAILURE,
    EXIT_BAD_INPUT: FAILURE,
    EXIT_INFRASTRUCTURE: EXCEPTION,
    EXIT_INTERRUPTED: CANCELLED,
}


class ContractorBuild(ShellCommand):
    """`contractor build` in the step's workdir, its exit code mapped to a result."""

    name = "contractor"
    description = ["contractor", "building"]
    descriptionDone = ["contractor", "build"]
    haltOnFailure = True
    flunkOnFailure = True

    def __init__(self, contractor="contractor", args=(), **kwargs):
        kwargs.setdefault("command", [contractor, "build", *args])
        # SIGTERM first: contractor destroys its VM and writes its record, then exits.
        kwargs.setdefault("sigtermTime", 60)
        # The VM's progress and the build's output are plain lines; no terminal.
        kwargs.setdefault("usePTY", False)
        super().__init__(**kwargs)

    @defer.inlineCallbacks
    def run(self):
        cmd = yield self.makeRemoteShellCommand()
        yield self.runCommand(cmd)
        return self.evaluateCommand(cmd)

    def evaluateCommand(self, cmd):
        """The Buildbot result for contractor's exit code `cmd.rc`."""
        if cmd.interrupted:
            # Stopped from the master: Buildbot's own CANCELLED, whatever the code.
            return CANCELLED
        return RESULTS.get(cmd.rc, EXCEPTION)
