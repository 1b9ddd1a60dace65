using QcowTier.Cli.Commands;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli;

/// <summary>The tool's entry point, callable in-process (tests capture its output through the writers).</summary>
internal static class Cli
{
    private static readonly Command[] Commands =
    [
        new AmendCommand(),
        new BenchCommand(),
        new BitmapCommand(),
        new CheckCommand(),
        new CommitCommand(),
        new CompareCommand(),
        new ConvertCommand(),
        new CreateCommand(),
        new HeatCommand(),
        new InfoCommand(),
        new IoCommand(),
        new MapCommand(),
        new MeasureCommand(),
        new RebalanceCommand(),
        new RebaseCommand(),
        new ResizeCommand(),
        new ServeCommand(),
        new SnapshotCommand(),
        new TierCommand(),
    ];

    public static int Run(IReadOnlyList<string> args, TextWriter stdout, TextWriter stderr)
        => Run(args, new CliContext(stdout, stderr));

    public static int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        try
        {
            return Dispatch(args, ctx);
        }
        finally
        {
            ctx.Out.Flush();
            ctx.Err.Flush();
        }
    }

    private static int Dispatch(IReadOnlyList<string> args, CliContext ctx)
    {
        if (args.Count == 0)
        {
            ctx.Error("Not enough arguments (try 'qcowtier --help')");
            return 1;
        }
        var verb = args[0];
        if (verb is "--help" or "-h" or "help")
        {
            PrintToolHelp(ctx);
            return 0;
        }
        if (verb is "--version" or "-V")
        {
            ctx.Out.WriteLine($"qcowtier version {typeof(Cli).Assembly.GetName().Version?.ToString(3)}");
            return 0;
        }
        var command = Commands.FirstOrDefault(c => c.Name == verb);
        if (command is null)
        {
            ctx.Error($"Command not found: {verb}");
            return 1;
        }
        // qemu-img's -U (--force-share) on any verb: skip the image locks QEMU and we take.
        Disks.DiskOpener.ForceShare = args.Skip(1).Any(a => a is "-U" or "--force-share");
        try
        {
            return command.Run(args.Skip(1).ToList(), ctx);
        }
        catch (CliException e)
        {
            ctx.Error(OneLine(e.Message));
            return e.ExitCode ?? command.FailureExitCode;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // Whatever escapes a verb is still one line: the user needs the cause, not our stack.
            ctx.Error(OneLine(e is IOException or UnauthorizedAccessException or InvalidOperationException or ArgumentException or NotSupportedException
                ? e.Message
                : $"{e.GetType().Name}: {e.Message}"));
            return command.FailureExitCode;
        }
    }

    private static string OneLine(string message) => message.ReplaceLineEndings(" ").Trim();

    private static void PrintToolHelp(CliContext ctx)
    {
        var o = ctx.Out;
        o.WriteLine("qcowtier: qcow2 and raw image utility, with qemu-img's verbs, options and output");
        o.WriteLine();
        o.WriteLine("usage: qcowtier [--help | --version] COMMAND [command options]");
        o.WriteLine();
        o.WriteLine("Command syntax:");
        foreach (var c in Commands)
        {
            o.WriteLine("  " + c.Synopsis);
        }
        o.WriteLine();
        o.WriteLine("Run 'qcowtier COMMAND --help' for what a command's options mean.");
        o.WriteLine("Formats: 'qcow2' and 'raw' (a plain file). Without -f the format is detected from");
        o.WriteLine("the file's magic number, never from its name.");
        o.WriteLine("Sizes take an optional suffix: b (bytes), k or K (KiB), M, G, T, P, E.");
        o.WriteLine("Cache modes (-t, -T): none, writeback, writethrough, directsync, unsafe.");
    }
}
