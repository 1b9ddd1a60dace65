using System.Globalization;
using Microsoft.Win32.SafeHandles;
using QcowTier.Storage;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Interop;

/// <summary>Where guest data goes: the image itself, a QEMU external data file, or one kept a valid raw image.</summary>
public enum DataPlacement
{
    Inline,
    DataFile,
    RawDataFile,
}

/// <summary>One point of the options matrix: preallocation × cluster size × compat × refcount width × data file.</summary>
public sealed record MatrixFormat(string Prealloc, int ClusterSize, bool V2, int RefcountBits, DataPlacement Data)
{
    public const string DataName = "img.data";

    public long Size => ClusterSize >= (2 << 20) ? 8L << 20 : Math.Max(256L << 10, 16L * ClusterSize);

    /// <summary>2 MiB clusters make every file 8 MiB and more: those cases run with the heavy tests.</summary>
    public bool Heavy => ClusterSize >= (2 << 20);

    public string QemuOptions
    {
        get
        {
            var o = string.Create(CultureInfo.InvariantCulture,
                $"cluster_size={ClusterSize},refcount_bits={RefcountBits},compat={(V2 ? "0.10" : "1.1")},preallocation={Prealloc}");
            return Data switch
            {
                DataPlacement.DataFile => o + ",data_file=" + DataName,
                DataPlacement.RawDataFile => o + ",data_file=" + DataName + ",data_file_raw=on",
                _ => o,
            };
        }
    }

    public QcowCreateOptions Ours => new()
    {
        ClusterSize = ClusterSize,
        RefcountBits = RefcountBits,
        Compat = V2 ? QcowCompat.V2 : QcowCompat.V3,
        Preallocation = Prealloc switch
        {
            "metadata" => QcowPreallocation.Metadata,
            "falloc" => QcowPreallocation.Falloc,
            "full" => QcowPreallocation.Full,
            _ => QcowPreallocation.Off,
        },
        DataFile = Data == DataPlacement.Inline ? null : DataName,
        DataFileRaw = Data == DataPlacement.RawDataFile,
    };

    public override string ToString() => $"{Prealloc}-c{ClusterSize}-{(V2 ? "v2" : "v3")}-r{RefcountBits}-{Data}";

    public static IEnumerable<MatrixFormat> All()
    {
        foreach (var prealloc in new[] { "off", "metadata", "falloc", "full" })
        {
            foreach (var cs in new[] { 512, 4096, 65536, 2 << 20 })
            {
                yield return new MatrixFormat(prealloc, cs, V2: true, 16, DataPlacement.Inline);
                foreach (var bits in new[] { 1, 16, 64 })
                {
                    foreach (var data in new[] { DataPlacement.Inline, DataPlacement.DataFile, DataPlacement.RawDataFile })
                    {
                        yield return new MatrixFormat(prealloc, cs, V2: false, bits, data);
                    }
                }
            }
        }
    }
}

/// <summary>
/// Images we create with every combination of the new options must pass qemu-img check and hold, for
/// qemu-img, exactly the content we wrote; preallocation must reserve (falloc, full) or not (off,
/// metadata) host space as QEMU does. Two qemu-img processes per case.
/// </summary>
public sealed class OursToQemuOptionsMatrixTests
{
    public static TheoryData<string, int, bool, int, DataPlacement> Cases() => OptionsMatrix.Data(MatrixFormat.All().Where(f => !f.Heavy));

    public static TheoryData<string, int, bool, int, DataPlacement> HeavyCases() => OptionsMatrix.Data(MatrixFormat.All().Where(f => f.Heavy));

    [Theory]
    [MemberData(nameof(Cases))]
    public void Our_image_is_clean_and_reads_identically_in_qemu(string prealloc, int cs, bool v2, int bits, DataPlacement data)
        => Run(prealloc, cs, v2, bits, data);

    [Theory]
    [Trait("Category", "Heavy")]
    [MemberData(nameof(HeavyCases))]
    public void Our_image_with_2M_clusters_is_clean_and_reads_identically_in_qemu(string prealloc, int cs, bool v2, int bits, DataPlacement data)
        => Run(prealloc, cs, v2, bits, data);

    private static void Run(string prealloc, int cs, bool v2, int bits, DataPlacement data)
    {
        var f = new MatrixFormat(prealloc, cs, v2, bits, data);
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        var model = new ContentModel(f.Size, cs);
        using (var img = QcowImage.Create(path, f.Size, f.Ours))
        {
            OptionsMatrix.AssertHostAllocation(f, dir, img);
            var ops = Scenarios.Followup(f.Size, cs, seed: cs + bits);
            using var runner = new OurRunner(img, () => throw new InvalidOperationException("no reopen"), Api.Sync);
            foreach (var op in ops.Where(o => o is not ReopenOp))
            {
                runner.Apply(op);
                model.Apply(op);
            }
        }
        var expected = dir.File("expected.raw");
        File.WriteAllBytes(expected, model.Bytes);
        OptionsMatrix.AssertCleanIn(dir, "img.qcow2");
        var r = Qemu.RunIn(dir.Path, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", "img.qcow2", "expected.raw");
        r.ExitCode.Should().Be(0, $"qemu-img reads what we wrote ({f}):\n{r.StdOut}{r.StdErr}");
    }
}

/// <summary>
/// Images QEMU creates with every combination (a subset of the widths) must read identically through
/// us, take our writes, and stay clean for qemu-img. Four QEMU processes per case.
/// </summary>
public sealed class QemuToOursOptionsMatrixTests
{
    private static IEnumerable<MatrixFormat> Subset()
        => MatrixFormat.All().Where(f => f.V2 || f.RefcountBits == 16 || (f.RefcountBits == 1 && f.Data == DataPlacement.Inline));

    public static TheoryData<string, int, bool, int, DataPlacement> Cases() => OptionsMatrix.Data(Subset().Where(f => !f.Heavy));

    public static TheoryData<string, int, bool, int, DataPlacement> HeavyCases() => OptionsMatrix.Data(Subset().Where(f => f.Heavy));

    [Theory]
    [MemberData(nameof(Cases))]
    public void Qemu_image_reads_identically_and_takes_our_writes(string prealloc, int cs, bool v2, int bits, DataPlacement data)
        => Run(prealloc, cs, v2, bits, data);

    [Theory]
    [Trait("Category", "Heavy")]
    [MemberData(nameof(HeavyCases))]
    public void Qemu_image_with_2M_clusters_reads_identically_and_takes_our_writes(string prealloc, int cs, bool v2, int bits, DataPlacement data)
        => Run(prealloc, cs, v2, bits, data);

    private static void Run(string prealloc, int cs, bool v2, int bits, DataPlacement data)
    {
        var f = new MatrixFormat(prealloc, cs, v2, bits, data);
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        Qemu.RunIn(dir.Path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", f.QemuOptions, "img.qcow2", f.Size.ToString(CultureInfo.InvariantCulture)).EnsureSuccess();
        var model = new ContentModel(f.Size, cs);
        var ops = Scenarios.Followup(f.Size, cs, seed: 3 * cs + bits);
        var args = new List<string> { "-f", "qcow2" };
        foreach (var op in ops)
        {
            args.Add("-c");
            args.Add(QemuTools.ToQemuIo(op, dir));
            model.Apply(op);
        }
        args.Add("img.qcow2");
        var io = Qemu.RunIn(dir.Path, "qemu-io", [.. args]);
        io.ExitCode.Should().Be(0, io.StdErr);

        using (var img = QcowImage.Open(path))
        {
            img.ExternalDataFile.Should().Be(data == DataPlacement.Inline ? null : dir.File(MatrixFormat.DataName));
            var buf = new byte[img.Size];
            img.Read(0, buf);
            QemuTools.AssertBytesEqual(model.Bytes, buf, $"our read of QEMU's {f}");
            var more = new List<Op>
            {
                new WriteOp(cs / 3, Scenarios.Random(new Random(cs), 2 * cs)),
                new ZeroOp(f.Size / 2, 2L * cs, Unmap: bits == 16),
                new DiscardOp(f.Size - 3L * cs, 2L * cs),
                new WriteOp(f.Size - 100, Scenarios.Random(new Random(bits), 100)),
            };
            using var runner = new OurRunner(img, () => throw new InvalidOperationException("no reopen"), Api.Sync);
            foreach (var op in more)
            {
                runner.Apply(op);
                model.Apply(op);
            }
        }
        File.WriteAllBytes(dir.File("expected.raw"), model.Bytes);
        OptionsMatrix.AssertCleanIn(dir, "img.qcow2");
        var r = Qemu.RunIn(dir.Path, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", "img.qcow2", "expected.raw");
        r.ExitCode.Should().Be(0, $"QEMU reads our writes ({f}):\n{r.StdOut}{r.StdErr}");
    }
}

internal static class OptionsMatrix
{
    public static TheoryData<string, int, bool, int, DataPlacement> Data(IEnumerable<MatrixFormat> formats)
    {
        var data = new TheoryData<string, int, bool, int, DataPlacement>();
        foreach (var f in formats)
        {
            data.Add(f.Prealloc, f.ClusterSize, f.V2, f.RefcountBits, f.Data);
        }
        return data;
    }

    /// <summary>qemu-img check in the image's folder (where QEMU resolves a relative data file name).</summary>
    public static void AssertCleanIn(TempDir dir, string name)
    {
        var r = Qemu.RunIn(dir.Path, "qemu-img", "check", "-f", "qcow2", name);
        if (r.ExitCode != 0)
        {
            throw new Xunit.Sdk.XunitException($"qemu-img check {name} exited {r.ExitCode}:\n{r.StdOut}{r.StdErr}");
        }
    }

    /// <summary>falloc and full reserve the data's host space (in the data file when there is one); off and metadata do not.</summary>
    public static void AssertHostAllocation(MatrixFormat f, TempDir dir, QcowImage img)
    {
        img.Flush();
        var file = f.Data == DataPlacement.Inline ? dir.File("img.qcow2") : dir.File(MatrixFormat.DataName);
        long allocated;
        using (SafeFileHandle h = File.OpenHandle(file, FileMode.Open, FileAccess.Read, FileShare.ReadWrite))
        {
            allocated = NativeMethods.AllocatedBytes(h);
        }
        if (allocated < 0)
        {
            return; // the platform cannot tell
        }
        if (f.Prealloc is "falloc" or "full")
        {
            allocated.Should().BeGreaterThanOrEqualTo(f.Size, $"{f}: every data cluster is reserved");
        }
        else
        {
            // The metadata (header, tables: whole clusters each) is allocated wherever it lives.
            var metadata = f.Data == DataPlacement.Inline ? 6L * f.ClusterSize : 0;
            allocated.Should().BeLessThan(f.Size + metadata, $"{f}: the data stays sparse");
        }
        if (f.Prealloc != "off")
        {
            img.GetMap().Should().OnlyContain(e => e.Kind == QcowExtentKind.Data, $"{f}: every cluster is linked");
        }
    }
}
