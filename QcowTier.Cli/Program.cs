namespace QcowTier.Cli;

internal static class Program
{
    public static int Main(string[] args)
    {
        Console.Error.WriteLine("qcowtier: not implemented yet");
        return args.Length == 0 ? 1 : 1;
    }
}
