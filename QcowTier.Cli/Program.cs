using System.Text;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli;

internal static class Program
{
    public static int Main(string[] args)
    {
        // Buffered: map and io -v can print a lot; progress and errors flush explicitly.
        var terminal = !Console.IsOutputRedirected;
        using var stdout = new StreamWriter(Console.OpenStandardOutput(), new UTF8Encoding(false), 1 << 16) { AutoFlush = terminal };
        using var stderr = new StreamWriter(Console.OpenStandardError(), new UTF8Encoding(false)) { AutoFlush = true };
        return Cli.Run(args, new CliContext(stdout, stderr, stdoutIsTerminal: terminal));
    }
}
