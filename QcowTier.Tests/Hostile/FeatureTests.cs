using QcowTier.Tests.Hostile.Support;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Hostile.Support.HostileImage;

namespace QcowTier.Tests.Hostile;

/// <summary>Features we do not implement: refused with <see cref="QcowUnsupportedFeatureException"/>, never read wrongly.</summary>
public sealed class FeatureTests
{
    private static readonly QcowOpenOptions ReadOnly = new() { ReadOnly = true };

    /// <summary>What qemu-img says after "Unsupported qcow2 feature(s): ".</summary>
    private static string QemuFeatureMessage(string path)
    {
        var r = QemuTools.Img("info", "-f", "qcow2", path);
        r.ExitCode.Should().NotBe(0);
        const string marker = "Unsupported qcow2 feature(s): ";
        var text = r.StdErr.Trim();
        var i = text.IndexOf(marker, StringComparison.Ordinal);
        i.Should().BeGreaterThanOrEqualTo(0, text);
        return text[i..].Trim();
    }

    public static TheoryData<string, ulong> UnknownIncompatibleBits() => new()
    {
        { "named", 1UL << 20 },
        { "unnamed", 1UL << 20 },
        { "two-named-in-table-order", (1UL << 20) | (1UL << 40) },
        { "named-and-two-unnamed", (1UL << 20) | (1UL << 33) | (1UL << 63) },
        { "two-unnamed", (1UL << 5) | (1UL << 6) },
    };

    [Theory]
    [MemberData(nameof(UnknownIncompatibleBits))]
    public void UnknownIncompatibleFeatureIsNamedAsQemuNamesIt(string variant, ulong bits)
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        var table = QemuFeatures.ToList();
        if (variant.StartsWith("named", StringComparison.Ordinal))
        {
            table.Add((0, 20, "frobnicated clusters"));
        }
        if (variant.StartsWith("two-named", StringComparison.Ordinal))
        {
            // Listed in the table before bit 20: QEMU reports in table order.
            table.Insert(0, (0, 40, "quantum refcounts"));
            table.Add((0, 20, "frobnicated clusters"));
        }
        img.SetExtensions((FeatureNameTableType, FeatureNameTable([.. table])));
        img.SetU64(IncompatibleFeatures, bits);
        var path = img.Save();
        var qemu = QemuFeatureMessage(path);

        foreach (var readOnly in new[] { true, false })
        {
            var e = Guard.Fails<QcowUnsupportedFeatureException>(() => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = readOnly }).Dispose());
            e.Message.Should().EndWith(qemu, "we name the features exactly as qemu-img does");
            e.Field.Should().Be("incompatible_features");
        }
    }

    [Fact]
    public void CorruptBitAllowsOnlyReadOnlyOpens()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.SetU64(IncompatibleFeatures, 2);
        var path = img.Save();
        Guard.Fails<QcowCorruptImageException>(() => QcowImage.Open(path).Dispose(), "corrupt", "read/write");
        using var ro = QcowImage.Open(path, ReadOnly);
        ro.GetInfo().Corrupt.Should().BeTrue();
        var buf = new byte[ro.Size];
        ro.Read(0, buf);
        QemuTools.AssertBytesEqual(QemuTools.ReadRaw(path, dir), buf, "a corrupt image still reads like QEMU reads it");
        File.ReadAllBytes(path).Should().Equal(img.Bytes);
    }

    [Theory]
    [InlineData(1u)]
    [InlineData(2u)]
    [InlineData(7u)]
    public void EncryptionMethodInHeaderIsUnsupported(uint method)
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.SetU32(CryptMethod, method);
        var path = img.Save();
        foreach (var readOnly in new[] { true, false })
        {
            var e = Guard.Fails<QcowUnsupportedFeatureException>(() => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = readOnly }).Dispose(), "encrypt");
            e.Field.Should().Be("crypt_method");
        }
    }

    [Fact]
    public void RealLuksEncryptedImageIsUnsupported()
    {
        using var dir = new TempDir();
        var path = dir.File("luks.qcow2");
        // qemu-img's PBKDF benchmark sometimes fails on a busy machine ("Unable to get accurate CPU usage"): retry.
        Qemu.Result r = null!;
        for (var attempt = 0; attempt < 8; attempt++)
        {
            r = QemuTools.Img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=hunter2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", path, "1M");
            if (r.ExitCode == 0)
            {
                break;
            }
            File.Delete(path);
        }
        r.EnsureSuccess();
        Guard.Fails<QcowUnsupportedFeatureException>(() => QcowImage.Open(path, ReadOnly).Dispose(), "encrypt");
    }

    /// <summary>qemu-img still creates legacy AES-CBC images (crypt_method 1): refused by name, read-only or not, as the CLI refuses creating one.</summary>
    [Fact]
    public void RealAesEncryptedImageIsUnsupported()
    {
        using var dir = new TempDir();
        var path = dir.File("aes.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=hunter2", "-o", "encrypt.format=aes,encrypt.key-secret=sec0", path, "1M").EnsureSuccess();
        foreach (var readOnly in new[] { true, false })
        {
            var e = Guard.Fails<QcowUnsupportedFeatureException>(() => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = readOnly }).Dispose(), "encrypt", "crypt_method 1");
            e.Field.Should().Be("crypt_method");
            e.Offset.Should().Be(32);
        }
        var cli = Cli.CliHarness.Run("create", "-q", "-f", "qcow2", "-o", "encryption=on", dir.File("enc.qcow2"), "1M");
        cli.ExitCode.Should().NotBe(0);
        cli.StdErr.Should().Contain("encrypt");
    }

    [Fact]
    public void ExtendedL2WithAnExternalDataFileIsRefusedByName()
    {
        using var dir = new TempDir();
        var path = dir.File("xl2.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,data_file=xl2.raw", path, "1M").EnsureSuccess();
        Guard.Fails<QcowUnsupportedFeatureException>(() => QcowImage.Open(path, ReadOnly).Dispose(), "extended L2", "external data file");
    }

    /// <summary>An absolute data file name (QEMU stores what it was given) is followed only when the opener allows it.</summary>
    [Fact]
    public void ExternalDataFileWithAnAbsoluteNameNeedsTheOption()
    {
        using var dir = new TempDir();
        var path = dir.File("ext.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"data_file={dir.File("data.raw")}", path, "1M").EnsureSuccess();
        QemuTools.Io("-f", "qcow2", "-c", "write -q -P 0x42 1000 70000", path).EnsureSuccess();
        Guard.Fails<QcowFormatException>(() => QcowImage.Open(path, ReadOnly).Dispose(), "absolute");
        using var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true, AllowExternalDataFileAnywhere = true });
        var buf = new byte[img.Size];
        img.Read(0, buf);
        QemuTools.AssertBytesEqual(QemuTools.ReadRaw(path, dir), buf, "content");
    }

    [Fact]
    public void ZstdCompressionTypeWithoutCompressedClustersReadsNormally()
    {
        using var dir = new TempDir();
        var path = dir.File("zstd.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", path, "1M").EnsureSuccess();
        QemuTools.Io("-f", "qcow2", "-c", "write -q -P 0x42 1000 70000", path).EnsureSuccess();
        using var img = QcowImage.Open(path, ReadOnly);
        img.GetInfo().CompressionType.Should().Be("zstd");
        var buf = new byte[img.Size];
        img.Read(0, buf);
        QemuTools.AssertBytesEqual(QemuTools.ReadRaw(path, dir), buf, "content");
    }

    [Fact]
    public void InternalSnapshotsOpenReadOnlyAndWritable()
    {
        using var dir = new TempDir();
        var path = CreateBase(dir).Path;
        QemuTools.Img("snapshot", "-c", "snap1", path).EnsureSuccess();
        QemuTools.Io("-f", "qcow2", "-c", "write -q -P 0x66 0 4k", path).EnsureSuccess();
        QcowImage.Open(path).Dispose(); // writes copy shared clusters (Snapshots/SnapshotTests)
        using var ro = QcowImage.Open(path, ReadOnly);
        ro.GetInfo().SnapshotCount.Should().Be(1);
        var buf = new byte[ro.Size];
        ro.Read(0, buf);
        QemuTools.AssertBytesEqual(QemuTools.ReadRaw(path, dir), buf, "the active layer reads like QEMU reads it (shared clusters included)");
    }
}
