using System.Globalization;
using System.Text.Json;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Interop.Support;

/// <summary>qemu-img check --output=json, parsed.</summary>
public sealed record CheckReport(int ExitCode, long Corruptions, long Leaks, long CheckErrors, string Raw)
{
    public bool Clean => ExitCode == 0 && Corruptions == 0 && Leaks == 0 && CheckErrors == 0;

    public bool NoCorruption => Corruptions == 0 && CheckErrors == 0 && ExitCode is 0 or 3;
}

/// <summary>Helpers over the real qemu-img/qemu-io that the shared <see cref="Qemu"/> class does not have.</summary>
public static class QemuTools
{
    /// <summary>Runs a QEMU tool (the shared runner retries image-lock conflicts caused by parallel tests).</summary>
    public static Qemu.Result Run(string tool, IReadOnlyList<string> args) => Qemu.Run(tool, args);

    public static Qemu.Result Img(params string[] args) => Run("qemu-img", args);

    public static Qemu.Result Io(params string[] args) => Run("qemu-io", args);

    /// <summary>qemu-img compare; throws unless the two images have the same content.</summary>
    public static void AssertSameContent(string a, string b)
    {
        var r = Img("compare", "-f", "qcow2", "-F", "qcow2", a, b);
        if (r.ExitCode != 0)
        {
            throw new Xunit.Sdk.XunitException($"qemu-img compare {a} {b} exited {r.ExitCode}:\n{r.StdOut}{r.StdErr}");
        }
    }

    public static void Create(string path, long size, ImageFormat fmt)
        => Img("create", "-q", "-f", "qcow2", "-o", fmt.QemuOptions, path, size.ToString(CultureInfo.InvariantCulture)).EnsureSuccess();

    /// <summary>Runs the operations through qemu-io (one process per run of operations between reopens).</summary>
    public static void Apply(string path, IEnumerable<Op> ops, TempDir scratch)
    {
        var batch = new List<string>();
        foreach (var op in ops)
        {
            if (op is ReopenOp)
            {
                RunIo(path, batch);
                batch.Clear();
                continue;
            }
            batch.Add(ToQemuIo(op, scratch));
        }
        RunIo(path, batch);
    }

    public static string ToQemuIo(Op op, TempDir scratch)
    {
        var inv = CultureInfo.InvariantCulture;
        switch (op)
        {
            case WriteOp w:
                var src = scratch.File($"src-{Guid.NewGuid():N}.bin");
                File.WriteAllBytes(src, w.Data);
                return string.Create(inv, $"write -q -s {src} {w.Offset} {w.Data.Length}");
            case ZeroOp z:
                return string.Create(inv, $"write -q -z{(z.Unmap ? " -u" : "")} {z.Offset} {z.Length}");
            case DiscardOp d:
                return string.Create(inv, $"discard -q {d.Offset} {d.Length}");
            case ResizeOp r:
                return string.Create(inv, $"truncate {r.NewSize}");
            case FlushOp:
                return "flush";
            default:
                throw new ArgumentException($"no qemu-io form for {op}", nameof(op));
        }
    }

    private static void RunIo(string path, List<string> commands)
    {
        if (commands.Count == 0)
        {
            return;
        }
        var args = new List<string> { "-f", "qcow2" };
        foreach (var c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(path);
        var r = Run("qemu-io", args);
        if (r.ExitCode != 0 || r.StdOut.Length > 0 || r.StdErr.Length > 0)
        {
            throw new Xunit.Sdk.XunitException($"qemu-io {string.Join(" | ", commands)} on {path} exited {r.ExitCode}:\n{r.StdOut}{r.StdErr}");
        }
    }

    /// <summary>The guest content as qemu-img convert -O raw reads it.</summary>
    public static byte[] ReadRaw(string path, TempDir scratch)
    {
        var raw = scratch.File($"raw-{Guid.NewGuid():N}.raw");
        Img("convert", "-f", "qcow2", "-O", "raw", path, raw).EnsureSuccess();
        try
        {
            return File.ReadAllBytes(raw);
        }
        finally
        {
            File.Delete(raw);
        }
    }

    public static CheckReport Check(string path, bool repairAll = false)
    {
        var args = new List<string> { "check", "--output=json", "-f", "qcow2" };
        if (repairAll)
        {
            args.Add("-r");
            args.Add("all");
        }
        args.Add(path);
        var r = Run("qemu-img", args);
        long corruptions = 0, leaks = 0, errors = 0;
        var json = r.StdOut.Trim();
        if (json.StartsWith('{'))
        {
            using var doc = JsonDocument.Parse(json);
            var root = doc.RootElement;
            corruptions = Get(root, "corruptions");
            leaks = Get(root, "leaks");
            errors = Get(root, "check-errors");
        }
        else
        {
            errors = 1; // qemu-img could not even open it
        }
        return new CheckReport(r.ExitCode, corruptions, leaks, errors, r.StdOut + r.StdErr);

        static long Get(JsonElement e, string name) => e.TryGetProperty(name, out var v) ? v.GetInt64() : 0;
    }

    /// <summary>qemu-img check must find neither corruption nor leaks.</summary>
    public static void AssertClean(string path)
    {
        var rep = Check(path);
        if (!rep.Clean)
        {
            var human = Img("check", "-f", "qcow2", path);
            throw new Xunit.Sdk.XunitException($"qemu-img check {path} is not clean (exit {rep.ExitCode}, {rep.Corruptions} corruptions, {rep.Leaks} leaks):\n{rep.Raw}\n{human.StdOut}{human.StdErr}");
        }
    }

    /// <summary>Leaked clusters allowed, nothing else.</summary>
    public static CheckReport AssertNoCorruption(string path)
    {
        var rep = Check(path);
        if (!rep.NoCorruption)
        {
            var human = Img("check", "-f", "qcow2", path);
            throw new Xunit.Sdk.XunitException($"qemu-img check {path} reports corruption (exit {rep.ExitCode}, {rep.Corruptions} corruptions):\n{rep.Raw}\n{human.StdOut}{human.StdErr}");
        }
        return rep;
    }

    /// <summary>Compares two byte arrays and reports the first difference by offset (FluentAssertions' output is unreadable for MiBs).</summary>
    public static void AssertBytesEqual(ReadOnlySpan<byte> expected, ReadOnlySpan<byte> actual, string what)
    {
        if (expected.Length != actual.Length)
        {
            throw new Xunit.Sdk.XunitException($"{what}: length {actual.Length}, expected {expected.Length}");
        }
        var diff = expected.CommonPrefixLength(actual);
        if (diff != expected.Length)
        {
            var last = diff;
            while (last < expected.Length && expected[last] != actual[last])
            {
                last++;
            }
            throw new Xunit.Sdk.XunitException($"{what}: first difference at byte {diff} (0x{diff:x}): expected 0x{expected[diff]:x2}, got 0x{actual[diff]:x2}; differing run ends at {last}");
        }
    }
}
