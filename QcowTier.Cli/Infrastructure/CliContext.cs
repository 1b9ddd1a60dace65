namespace QcowTier.Cli.Infrastructure;

/// <summary>Where a verb writes; tests pass string writers, the real tool the process's streams.</summary>
internal sealed class CliContext
{
    public CliContext(TextWriter stdout, TextWriter stderr, bool stdoutIsTerminal = false)
    {
        Out = stdout;
        Err = stderr;
        StdoutIsTerminal = stdoutIsTerminal;
    }

    public TextWriter Out { get; }

    public TextWriter Err { get; }

    /// <summary>Progress is drawn as a bar only on a terminal; elsewhere qemu-img's plain lines keep scripts working.</summary>
    public bool StdoutIsTerminal { get; }

    public void Error(string message)
    {
        Out.Flush();
        Err.WriteLine("qcowtier: " + message);
        Err.Flush();
    }
}
