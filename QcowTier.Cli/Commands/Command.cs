using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>One qemu-img-style verb.</summary>
internal abstract class Command
{
    public abstract string Name { get; }

    /// <summary>The verb's synopsis line, as in qemu-img --help.</summary>
    public abstract string Synopsis { get; }

    /// <summary>What the verb's --help prints after the synopsis.</summary>
    public abstract string Help { get; }

    /// <summary>The exit code of a failure that has none of its own (qemu-img compare uses 2).</summary>
    public virtual int FailureExitCode => 1;

    public abstract int Run(IReadOnlyList<string> args, CliContext ctx);

    protected int PrintHelp(CliContext ctx)
    {
        ctx.Out.WriteLine("usage: qcowtier " + Synopsis);
        ctx.Out.WriteLine();
        ctx.Out.Write(Help);
        return 0;
    }

    /// <summary>--output=human|json, as qemu-img spells the error.</summary>
    protected static bool ParseJsonOutput(ParsedOptions o)
    {
        var v = o.Get("output");
        return v switch
        {
            null or "human" => false,
            "json" => true,
            _ => throw new CliException($"--output must be used with human or json as argument."),
        };
    }
}
