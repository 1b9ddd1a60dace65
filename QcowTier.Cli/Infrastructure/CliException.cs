namespace QcowTier.Cli.Infrastructure;

/// <summary>A failure reported as one line on stderr with the verb's exit code, never with a stack trace.</summary>
internal sealed class CliException : Exception
{
    public CliException() : this("unknown error") { }

    public CliException(string message) : base(message) { }

    public CliException(string message, Exception inner) : base(message, inner) { }

    public CliException(string message, int exitCode) : base(message) => ExitCode = exitCode;

    /// <summary>The exit code, or null for the verb's usual failure code.</summary>
    public int? ExitCode { get; }
}
