using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

/// <summary>Runs qcowtier in-process with captured output, and builds images for the comparisons.</summary>
internal static class CliHarness
{
    public static Qemu.Result Run(params string[] args)
    {
        using var stdout = new StringWriter();
        using var stderr = new StringWriter();
        var code = QcowTier.Cli.Cli.Run(args, stdout, stderr);
        return new Qemu.Result(code, stdout.ToString(), stderr.ToString());
    }

    /// <summary>qemu-io with its commands; throws unless it succeeded.</summary>
    public static void QemuIo(string path, string format, params string[] commands)
    {
        var args = new List<string> { "-f", format };
        foreach (var c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(path);
        Qemu.Io([.. args]).EnsureSuccess();
    }

    /// <summary>A qcow2 image made by qemu-img with data, zero clusters and unallocated ranges.</summary>
    public static string MixedQcow(TempDir dir, string name = "mixed.qcow2", string options = "cluster_size=65536")
    {
        var path = dir.File(name);
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", options, path, "64M").EnsureSuccess();
        QemuIo(path, "qcow2",
            "write -P 1 0 256k",
            "write -z 1M 128k",
            "write -P 2 2M 64k",
            "write -P 3 1088k 64k",
            "write -P 0 4M 64k",
            "write -z -u 0 64k",
            "write -P 0x55 63M 4k");
        return path;
    }

    /// <summary>Lines of the one-line error contract: exactly one line, prefixed, no stack trace.</summary>
    public static void ShouldBeOneLineError(this Qemu.Result r, string? contains = null)
    {
        r.ExitCode.Should().NotBe(0, "the command failed");
        var lines = r.StdErr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        lines.Should().HaveCount(1, $"stderr was: {r.StdErr}");
        lines[0].Should().StartWith("qcowtier: ");
        lines[0].Should().NotContain(" at QcowTier.");
        if (contains is not null)
        {
            lines[0].Should().Contain(contains);
        }
    }

    /// <summary>qemu-img's line with its own program name replaced by ours.</summary>
    public static string AsOurs(string qemuStderr) => qemuStderr.Replace("qemu-img: ", "qcowtier: ", StringComparison.Ordinal).Replace("qemu-io: ", "qcowtier: ", StringComparison.Ordinal);
}
